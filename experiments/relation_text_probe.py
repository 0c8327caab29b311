"""Is the relation in the text encoder's token states? A linear probe, layer by layer.

    .venv/bin/python experiments/relation_text_probe.py [--colours 40] [--seed 0]

For position captions of the shapes world ("a red circle left of a blue square on a white
background"), the state of each shape word is labelled with where that object is (left, right, top,
bottom: "left of" puts the first object left and the second right). A logistic-regression probe is
fit on the shape-word states of MiniLM's layers and scored on captions whose (unordered) shape pair
it never saw. Near 1.0 means the side of each object can be read off its own token state, so a
U-Net's cross-attention has what it needs; 0.25 is chance. The word embeddings (layer 0) are the
control: the first shape word's side depends only on the relation word, which layer 0 cannot see.
"""

import argparse
import itertools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ember.config import MINILM  # noqa: E402
from ember.data.shapes import COLOURS, RELATIONS, SHAPES, ObjectSpec, SceneSpec, describe  # noqa: E402
from ember.models.text import load_minilm_pretrained  # noqa: E402
from ember.models.tokenizer import build_minilm_tokenizer  # noqa: E402

SIDES = {"left of": ("left", "right"), "right of": ("right", "left"),
         "above": ("top", "bottom"), "below": ("bottom", "top")}  # fmt: skip
LABELS = ("left", "right", "top", "bottom")


def captions(n_colours: int, seed: int) -> list[tuple[str, str, str, str, str]]:
    """(caption, shape A, shape B, side of A, side of B) for every ordered shape pair and relation,
    each with `n_colours` random colour pairs."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows = []
    for a, b in itertools.permutations(SHAPES, 2):
        for relation in RELATIONS:
            for _ in range(n_colours):
                ca, cb = rng.choice(names, 2, replace=False)
                spec = SceneSpec(
                    "position", (ObjectSpec(a, ca), ObjectSpec(b, cb)), "white", relation
                )
                rows.append((describe(spec), a, b, *SIDES[relation]))
    return rows


@torch.no_grad()
def shape_word_states(rows, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """States (2 per caption: shape A's word, then B's) at every layer: (layers + 1, 2N, D)."""
    tok = build_minilm_tokenizer(MINILM)
    encoder = load_minilm_pretrained(MINILM)
    shape_ids = {s: tok.encode(s) for s in SHAPES}
    assert all(len(v) == 1 for v in shape_ids.values()), shape_ids  # one word piece each
    seqs, where, labels = [], [], []
    for caption, a, b, side_a, side_b in rows:
        ids = [tok.bos_token_id, *tok.encode(caption), tok.eos_token_id]
        seqs.append(ids)
        where += [ids.index(shape_ids[a][0]), len(ids) - 1 - ids[::-1].index(shape_ids[b][0])]
        labels += [LABELS.index(side_a), LABELS.index(side_b)]
    # One padded batch per depth; padding is masked out of attention, as in the encoder.
    width = max(map(len, seqs))
    ids = torch.tensor([s + [MINILM.pad_token_id] * (width - len(s)) for s in seqs])
    keep = (ids != MINILM.pad_token_id)[:, None, None, :]
    position_ids = torch.arange(width).expand(len(seqs), -1)
    rows_idx = torch.arange(len(seqs)).repeat_interleave(2)
    feats = [
        encoder.transformer(ids, position_ids, keep, d)[rows_idx, torch.tensor(where)]
        for d in range(layers + 1)
    ]
    return torch.stack(feats).numpy(), np.array(labels)


def probe_accuracy(x_train, y_train, x_test, y_test) -> float:
    """Multinomial logistic regression (L-BFGS, light L2) on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = torch.tensor((x_train - mean) / std, dtype=torch.float32)
    xte = torch.tensor((x_test - mean) / std, dtype=torch.float32)
    ytr = torch.tensor(y_train)
    lin = torch.nn.Linear(xtr.shape[1], len(LABELS))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + 1e-3 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(1).numpy() == y_test).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--colours", type=int, default=20, help="colour pairs per shape pair/relation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rows = captions(args.colours, args.seed)
    states, labels = shape_word_states(rows, MINILM.num_layers)
    # Hold out a third of the unordered shape pairs (both orders, every relation and colour).
    pairs = sorted({tuple(sorted((a, b))) for _, a, b, _, _ in rows})
    rng = np.random.default_rng(args.seed)
    test_pairs = {pairs[i] for i in rng.choice(len(pairs), len(pairs) // 3, replace=False)}
    test = np.repeat([tuple(sorted((a, b))) in test_pairs for _, a, b, _, _ in rows], 2)
    report = {"captions": len(rows), "held_out_shape_pairs": sorted(test_pairs), "accuracy": {}}
    for layer in range(states.shape[0]):
        x = states[layer]
        acc = probe_accuracy(x[~test], labels[~test], x[test], labels[test])
        report["accuracy"][f"layer {layer}"] = round(acc, 3)
        print(f"layer {layer}: held-out accuracy {acc:.3f}", flush=True)
    shuffled = rng.permutation(labels[~test])
    x = states[MINILM.num_layers - 1]
    report["shuffled_labels_layer_5"] = round(
        probe_accuracy(x[~test], shuffled, x[test], labels[test]), 3
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
