"""Regenerate jaxcirc/data/capital_pairs.jsonl: "The capital of X is" minimal pairs for SmolLM2.

Keeps countries whose name and capital are single tokens (with a leading space) and whose
capital SmolLM2 ranks first; each clean prompt is paired with another kept country (different
capital) as the corrupted prompt. Run: .venv/bin/python scripts/make_capital_pairs.py
"""

import csv
import json
import random
from importlib import resources

import numpy as np

import jaxcirc


def main(out: str = "jaxcirc/data/capital_pairs.jsonl", seed: int = 0) -> None:
    model = jaxcirc.load("smollm2-135m")
    tok = model.tokenizer
    with resources.files("jaxcirc").joinpath("data/world_capitals.csv").open() as f:
        rows = list(csv.DictReader(f))
    single = [(r["country"], r["capital"]) for r in rows
              if len(tok.encode(" " + r["capital"])) == 1 and len(tok.encode(" " + r["country"])) == 1]
    prompts = [f"The capital of {country} is" for country, _ in single]
    logits, _ = jaxcirc.run(model, prompts)
    predicted = np.asarray(logits[:, -1]).argmax(-1)
    kept = [i for i, (_, capital) in enumerate(single) if predicted[i] == tok.encode(" " + capital)[0]]
    rng = random.Random(seed)
    with open(out, "w") as f:
        for i in kept:
            j = rng.choice([k for k in kept if single[k][1] != single[i][1]])
            f.write(json.dumps({"clean": prompts[i], "corrupt": prompts[j],
                                "answer": " " + single[i][1], "foil": " " + single[j][1]}) + "\n")
    print(f"{len(kept)} pairs of {len(single)} single-token countries -> {out}")


if __name__ == "__main__":
    main()
