"""The end-of-run report: report.md and loss.png next to the checkpoints."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def num(v, fmt="{:,.4f}") -> str:
    """A figure, or n/a where there is none (no evaluation, no steady step, no known peak)."""
    return "n/a" if v is None else fmt.format(v)


def write_report(folder, summary: dict, title: str = "nanojax training report") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    history = summary["history"]
    metric = summary["eval_metric"]  # bpb, or loss for finetuning (train.RunConfig.eval_metric)
    plot_losses(folder / "loss.png", history.train_loss, getattr(history, f"val_{metric}"), VAL_LABELS[metric])

    core = ", ".join(f"{value:.4f} (step {step})" for step, value in history.core_metric)  # pretraining with a bundle
    core_row = [f"| CORE metric | {core} |"] if core else []
    lines = [
        f"# {title}",
        "",
        "| | |",
        "|---|---|",
        f"| model config | `{summary['model_config']}` |",
        f"| parameters | {summary['num_params']:,} (scaling: {summary['num_scaling_params']:,}) |",
        f"| FLOPs per token | {summary['flops_per_token']:.3e} |",
        f"| tokens trained | {summary['tokens']:,} |",
        f"| training time | {summary['training_time_s']:.1f} s (steady steps, compilation excluded) |",
        f"| tokens/s | {num(summary['tokens_per_s'], '{:,.0f}')} |",
        f"| MFU | {num(summary['mfu'], '{:.1f}%')} |",
        f"| peak memory | {summary['peak_memory_bytes'] / 2**20:,.0f} MiB |",
        f"| devices | {summary['devices']} |",
        f"| final train loss (EMA) | {num(summary['final_loss'])} |",
        f"| min / final val {metric} | {num(summary[f'min_val_{metric}'])} / {num(summary[f'final_val_{metric}'])} |",
        *core_row,
        "",
        "## Command line",
        "",
        f"`{summary['user_config']}`",
        "",
        "## Samples (greedy)",
        "",
        *[f"    {s!r}" for s in history.samples],
        "",
        "![loss](loss.png)",
        "",
    ]
    return _write(folder / "report.md", lines)


def append_report(folder, lines: list[str]) -> Path:
    """An evaluation's lines, printed and appended to the model's report.md (base_eval, chat_eval)."""
    print("\n".join(lines))
    path = Path(folder) / "report.md"
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(lines))
    print(f"appended to {path}")
    return path


VAL_LABELS = {"bpb": "val bits per byte", "loss": "val loss (assistant tokens, nats)"}


def plot_losses(path, train_loss, val, val_label=VAL_LABELS["bpb"]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.3))
    if train_loss:
        ax.plot(*zip(*train_loss, strict=True), label="train loss (EMA, nats)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label=val_label)
        ax2.set_ylabel(val_label)
        fig.legend(loc="upper center", ncol=2, frameon=False)
    else:
        ax.legend()
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the legend above the axes
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_rl_report(folder, summary: dict, title: str) -> Path:
    """chat_rl's report.md and reward.png: the mean reward per step and pass@1 at each evaluation."""
    folder = Path(folder)
    rewards, passk = summary["history"]["reward"], summary["history"]["pass@k"]
    fig, ax = plt.subplots(figsize=(7, 4.3))
    ax.plot(*zip(*rewards, strict=True), label="mean reward of the step's samples")
    ax.plot([step for step, _ in passk], [ps[0] for _, ps in passk], "o-", label="held-out pass@1 (temperature 1)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "reward.png", dpi=100)
    plt.close(fig)
    k = len(passk[0][1])  # there is always the evaluation at the end
    table = ["| step | " + " | ".join(f"pass@{j}" for j in range(1, k + 1)) + " |", "|---" * (k + 1) + "|"]
    table += [f"| {step} | " + " | ".join(f"{p:.4f}" for p in ps) + " |" for step, ps in passk]
    lines = [f"# {title}", "", f"{summary['num_steps']} steps; held-out pass@k (temperature 1):", "", *table]
    lines += ["", "## Command line", "", f"`{summary['user_config']}`", "", "![reward](reward.png)", ""]
    return _write(folder / "report.md", lines)


def _write(path: Path, lines: list[str]) -> Path:
    """The run's report, whose last line is its plot; what evaluations appended (append_report) to the report
    of the run this one resumed stays after it. (A fresh run's folder holds no report: an earlier run's
    folder was moved aside.)"""
    text = "\n".join(lines)
    closing = lines[-2] + "\n"  # the plot's line
    if path.is_file() and closing in (old := path.read_text(encoding="utf-8")):
        text += old.split(closing, 1)[1]
    path.write_text(text, encoding="utf-8")
    return path
