"""Every benchmark report the docs name is in the repo: each `docs/bench/...` path written in a
Markdown file exists (a `--report` prefix counts when PREFIX.json exists), and each benchmark's
default output lands in an existing topic folder under docs/bench/."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "docs" / "bench"

# Outputs the docs name as where a benchmark writes, not yet measured on this repo's machines
# (they need a GPU, or the committed report carries a dataset suffix).
NOT_YET_MEASURED = {
    "docs/bench/training/gpu_check.json",
    "docs/bench/serving/serving_gpu_check.json",
    "docs/bench/serving/two_stage_quality.json",
    "docs/bench/kernels/attention.json",
    "docs/bench/kernels/embedding_bag.json",
}

MENTION = re.compile(r"docs/bench/[A-Za-z0-9_{},./-]*[A-Za-z0-9_}]")
IMAGE_LINK = re.compile(r"\]\((bench/[^)\s]+)\)")
STRING_DEFAULT = re.compile(r"default=\"(docs/bench/[^\"]+)\"")
JOINED_DEFAULT = re.compile(r"\"docs\" / \"bench\"((?: / \"[^\"]+\")+)")
BRACES = re.compile(r"\{([^{}]*)\}")


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "src").rglob("*.md"))]


def expand(path: str) -> list[str]:
    """`a{,_b}.json` -> [`a.json`, `a_b.json`] (the shell's brace expansion, as the docs write it)."""
    parts = BRACES.split(path)
    literals, choices = parts[0::2], [p.split(",") for p in parts[1::2]]
    return ["".join(itertools.chain.from_iterable(zip(literals, combo + ("",))))
            for combo in itertools.product(*choices)] if choices else [path]


def mentioned_paths() -> set[tuple[str, str]]:
    found = set()
    for md in markdown_files():
        text = md.read_text(encoding="utf-8")
        for match in MENTION.findall(text):
            found.update((str(md.relative_to(REPO)), p) for p in expand(match))
        for link in IMAGE_LINK.findall(text):
            found.add((str(md.relative_to(REPO)), str((md.parent / link).resolve().relative_to(REPO))))
    return found


def is_placeholder(path: str) -> bool:
    return any(word.isupper() for word in re.split(r"[^A-Za-z]+", path) if len(word) > 1)


def test_every_bench_path_in_the_docs_exists():
    missing = []
    for source, path in sorted(mentioned_paths()):
        target = REPO / path.rstrip("/.")
        if is_placeholder(path) or path in NOT_YET_MEASURED:
            ok = target.parent.is_dir() and target.parent != BENCH
        else:
            ok = target.exists() or target.with_name(target.name + ".json").exists()
        if not ok:
            missing.append(f"{source}: {path}")
    assert not missing, "docs name bench files that are not there:\n" + "\n".join(missing)


def test_benchmark_default_outputs_land_in_a_topic_folder():
    defaults = []
    for script in sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "src" / "unirank").rglob("*.py")]):
        text = script.read_text(encoding="utf-8")
        defaults += [(script.name, p) for p in STRING_DEFAULT.findall(text)]
        defaults += [(script.name, "docs/bench/" + "/".join(re.findall(r"\"([^\"]+)\"", tail)))
                     for tail in JOINED_DEFAULT.findall(text)]
    assert len(defaults) >= 8  # the benchmarks that write under docs/bench by default
    wrong = [f"{name}: {p}" for name, p in defaults
             if (REPO / p).parent == BENCH or not (REPO / p).parent.is_dir()]
    assert not wrong, "default outputs outside an existing docs/bench/<topic>/ folder:\n" + "\n".join(wrong)


def test_brace_expansion_reads_like_the_shell():
    assert expand("a{,_q,_r}.json") == ["a.json", "a_q.json", "a_r.json"]
    assert expand("e_{fp32,bf16}.json") == ["e_fp32.json", "e_bf16.json"]
    assert expand("plain.json") == ["plain.json"]
