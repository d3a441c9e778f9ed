"""On-policy preference pairs: the model's own wrong answers as `rejected`, the reference as `chosen`.

    python scripts/make_dpo_pairs.py --load_from out/demo/full_sft_128.pth --out out/demo/dpo_on_policy.jsonl
    python trainer/train_dpo.py --data_path out/demo/dpo_on_policy.jsonl --from_weight out/demo/full_sft_128.pth

The shipped `dataset/demo/dpo.jsonl` rejects fixed near misses (the answer plus or minus one or ten) that the
model may never say; DPO then pushes down replies it was not going to give. Here the model answers the RL
prompts (`dataset/demo/rlaif.jsonl`: a question and its `answer`, none of them an evaluation question),
greedily as `eval_llm.py` would, and every prompt it gets wrong becomes a pair: the reference answer against
exactly what it said. A prompt it answers correctly gives no pair (there is no mistake to push down).

Prints one JSON object on its last line: prompts answered, pairs written, the model's accuracy on the prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scripts.common import DEMO, last_json, run


def pairs_from_answers(details: list[dict], records: list[dict]) -> list[dict]:
    """A DPO pair for each wrongly answered record (same order): its conversation, then the reference
    answer (`chosen`) or the model's reply (`rejected`). Empty replies are kept: saying nothing is a mistake too."""
    pairs = []
    for detail, record in zip(details, records, strict=True):
        if detail["correct"]:
            continue
        conversation = record["conversations"]
        prompt = conversation[:-1] if conversation[-1]["role"] == "assistant" else conversation  # drop a reference reply
        pairs.append({side: prompt + [{"role": "assistant", "content": reply}]
                      for side, reply in (("chosen", str(record["answer"])), ("rejected", detail["prediction"].strip()))}
                     | {"answer": str(record["answer"])})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load_from", required=True, help="the model that answers (.pth with its .json, or an HF directory)")
    parser.add_argument("--prompts", default=str(DEMO / "rlaif.jsonl"), help="jsonl of {conversations, answer}")
    parser.add_argument("--out", required=True, help="where the pairs go (DPO jsonl)")
    parser.add_argument("--max_prompts", type=int, default=0, help="answer only the first N prompts (0 = all)")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    answers = out.with_suffix(".answers.json")
    summary = last_json(run([sys.executable, "eval_llm.py", "--load_from", str(Path(args.load_from).resolve()),
                             "--eval_file", str(Path(args.prompts).resolve()), "--max_new_tokens", str(args.max_new_tokens),
                             "--batch_size", "50", "--device", args.device, "--eval_out", str(answers),
                             "--max_samples", str(args.max_prompts)]))
    records = [json.loads(line) for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = records[:args.max_prompts] if args.max_prompts else records
    pairs = pairs_from_answers(json.loads(answers.read_text())["predictions"], records)
    out.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs), encoding="utf-8")
    print(f"{len(pairs)} pairs from {len(records)} prompts -> {out}")
    print(json.dumps({"prompts": len(records), "pairs": len(pairs), "accuracy": summary["accuracy"], "out": str(out)}))


if __name__ == "__main__":
    main()
