"""Text generation for trained models: streaming generation, chat sessions, the `inference_example.py` CLI."""
