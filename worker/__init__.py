import os

# tqdm takes its defaults from the environment when it is first imported (torch imports it), and transformers draws
# a bar while it converts a GGUF file on the first start: the worker's output stays one JSON record a line.
os.environ.setdefault("TQDM_DISABLE", "1")
