"""How well a checkpoint's temperature calibrates, on each split of its data (bench/after_training.md).

    python bench/calibration.py RUN/best.safetensors --data-dir DIR                  # val and test
    python bench/calibration.py RUN/best.safetensors --data-dir DIR --splits test --predicted cat dog

For each split: ECE, NLL and Brier at T = 1 and at the checkpoint's T (train.py fitted it on the
validation split, so `val` is optimistic and `test` is the honest measure); how many mistakes the
network made at 90% confidence or more and their share of the split's NLL (a few of them decide
the fitted T); and the ECE that a perfectly calibrated network with the same confidences would
still show on so few images (each image right with probability its confidence, 2,000 draws; the
median), below which no ECE means anything. --predicted adds a row per split for the images
predicted as one of those classes: how sure the network is when it says "cat" or "dog", and how
often it is right then.
"""

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402

CONFIDENT, DRAWS = 0.9, 2000


def chance_ece(confidence, classes, generator):
    """The median ECE of a calibrated network with these top-class confidences: logits whose top
    class has probability c, and a label that is that class with probability c."""
    others = ((1 - confidence) / (classes - 1)).clamp(min=1e-12).log()
    logits = torch.cat([confidence.log()[:, None], others[:, None].expand(-1, classes - 1)], 1)
    draws = [
        evaluate.calibration(logits, (torch.rand(len(confidence), generator=generator) >= confidence).long())["ece"]
        for _ in range(DRAWS)
    ]
    return torch.tensor(draws).median().item()


def split_logits(checkpoint, data_dir, split, model, metadata):
    args = evaluate.parse_args([checkpoint, "--data-dir", data_dir, "--split", split, "--no-plots"])
    with contextlib.redirect_stdout(sys.stderr):  # the loading's lines, apart from the table
        images, labels, _ = evaluate.load_split(args, metadata)
    return evaluate.predict(model, images, metadata, args.batch_size, False, torch.device("cpu")), labels


def row(name, logits, labels, metadata):
    report = evaluate.calibration_report(logits, labels, metadata)
    raw, calibrated = report["raw"], report["calibrated"] or report["raw"]
    confidence, predicted = logits.softmax(1).max(1)
    sure = confidence.double().mean(), (logits / calibrated["temperature"]).softmax(1).max(1).values.double().mean()
    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    confident_mistakes = (predicted != labels) & (confidence >= CONFIDENT)
    chance = chance_ece(confidence.double(), logits.shape[1], torch.Generator().manual_seed(0))
    scores = " | ".join(f"{raw[key]:.4f} -> {calibrated[key]:.4f}" for key in ("ece", "nll", "brier"))
    return (
        f"| {name} | {len(labels)} | {(predicted == labels).double().mean():.2%} | {sure[0]:.2%} -> {sure[1]:.2%} | "
        f"{scores} | "
        f"{int(confident_mistakes.sum())} ({nll[confident_mistakes].sum() / nll.sum():.0%}) | {chance:.4f} |"
    )


def main():
    parser = evaluate.data.parser_of(__doc__, [("checkpoint", {}, "a checkpoint of train.py")])
    parser.add_argument("--data-dir", required=True, help="the run's folder of train/, val/ and test/")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    parser.add_argument("--predicted", nargs="+", default=[], metavar="CLASS", help="a row of these predictions too")
    args = parser.parse_args()
    model, metadata = evaluate.load_checkpoint(args.checkpoint)
    if unknown := set(args.predicted) - set(metadata["classes"]):
        parser.error(f"--predicted {' '.join(sorted(unknown))}: not among the checkpoint's {metadata['classes']}")
    chosen = torch.tensor([metadata["classes"].index(name) for name in args.predicted], dtype=torch.long)
    rows = []
    for split in args.splits:
        try:
            logits, labels = split_logits(args.checkpoint, args.data_dir, split, model, metadata)
        except evaluate.data.UserError as error:
            sys.exit(f"error: --splits {split}: {error}")
        rows.append(row(split, logits, labels, metadata))
        picked = torch.isin(logits.argmax(1), chosen)
        if picked.any():  # none without --predicted, or when the network never says those classes
            name = f"{split}, predicted {' or '.join(args.predicted)}"
            rows.append(row(name, logits[picked], labels[picked], metadata))
    if "temperature" in metadata:
        fitted = f"T = {metadata['temperature']:.3f}, fitted on {metadata['calibration']['fitted_on']}"
    else:
        fitted = "no temperature (written before train.py fitted one): both columns at T = 1"
    print(f"{args.checkpoint}: {fitted}; ECE in {evaluate.CALIBRATION_BINS} bins\n")
    print(
        "| split | images | accuracy | mean confidence, T = 1 -> T | ECE, T = 1 -> T | NLL, T = 1 -> T "
        "| Brier, T = 1 -> T | mistakes at >= 90% (share of the NLL) | ECE of a calibrated network, by chance |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
