"""Template and tokenise SFT conversations (``{messages: [{from, content}], category?}``) into arrow parts.

    python prepare_sft_dataset.py --data_input_dirs sft --tokenizer_dir TOK --data_output_dirs OUT \
        --llama_version 2 --max_length 4096 [--chat_template tokenizer] [--system_message "..."] [--packing]

See ``colossal_llama/dataset/pipeline.py`` for the pipeline and the data contract.
"""
from colossal_llama.dataset.cli import sft_main

if __name__ == "__main__":
    sft_main()
