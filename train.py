"""Continual pre-training / SFT with a booster plugin. See ``colossal_llama/training/cli.py`` for the flags.

    torchrun --nproc_per_node 2 train.py --pretrained MODEL --dataset OUT/arrow --plugin ddp --save_dir ckpt
"""
from colossal_llama.training.cli import main

if __name__ == "__main__":
    main()
