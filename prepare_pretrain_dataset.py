"""Tokenise and pack pre-training jsonl (``{source, target, category}``) into arrow parts.

    python prepare_pretrain_dataset.py --data_input_dirs a,b --tokenizer_dir TOK --data_output_dirs OUT \
        --max_length 4096 --num_spliced_dataset_bins 10 --seed 42 --num_proc 2

See ``colossal_llama/dataset/prepare.py`` for the pipeline and the data contract.
"""
from colossal_llama.dataset.prepare import pretrain_main

if __name__ == "__main__":
    pretrain_main()
