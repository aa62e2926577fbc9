from colossal_llama.eval.web.server import main

if __name__ == "__main__":
    main()
