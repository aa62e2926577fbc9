"""Tokenise and pack pre-training jsonl (``{source, target, category}``) into arrow parts.

    python prepare_pretrain_dataset.py --data_input_dirs a,b --tokenizer_dir TOK --data_output_dirs OUT \
        --max_length 4096 --num_spliced_dataset_bins 10 --seed 42 --num_proc 2
    colossalai run --nproc_per_node 1 --hostfile H prepare_pretrain_dataset.py ...   # one shard per node

See ``colossal_llama/dataset/pipeline.py`` for the pipeline and the data contract.
"""
from colossal_llama.dataset.cli import pretrain_main

if __name__ == "__main__":
    pretrain_main()
