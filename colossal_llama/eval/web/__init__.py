"""Local chat web page for a trained model: ``python -m colossal_llama.eval.web --model_path M [--port 0]``."""
