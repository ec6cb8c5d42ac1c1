"""llama.cpp (llama-cpp-python, in its own venv) decoding a GGUF in process: the bar the quantized benchmarks
hold genserve to. No side effects on import (quant_http.py starts servers from the importing process)."""

from __future__ import annotations

PROMPT = "Write a short story about a robot who learns to paint."
SHORT, LONG = 8, 72  # decode tok/s = (LONG - SHORT) / (time for LONG - time for SHORT): prefill cancels out

LLAMACPP_SCRIPT = """
import itertools, json, sys, time
from llama_cpp import Llama
path, prompt, threads, short, long, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:7])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_batch=512, verbose=False)
tokens = llm.tokenize(prompt.encode())
def run(n):
    llm.reset()
    start = time.perf_counter()
    list(itertools.islice(llm.generate(tokens, top_k=1, temp=0.0, reset=True), n))
    return time.perf_counter() - start
run(short)
best = min(run(long) - run(short) for _ in range(rounds))
print(json.dumps({"decode_tok_s": (long - short) / best}))
"""
