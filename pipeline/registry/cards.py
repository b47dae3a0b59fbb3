"""Model cards: the markdown description promote writes on each registered version, for its reviewer, and the
history of people's decisions about it."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence
from urllib.parse import urlencode

import mlflow
from mlflow.entities.model_registry import ModelVersion

from pipeline.core.catalog import ModelSpec
from pipeline.registry.policy import Verdict, key_tags, measure, metric_label, policy_text
from pipeline.registry.tracking import data_digests, differing_params
from pipeline.registry.versions import KERNELS_FACT

SHORT = 12  # hex digits shown of a sha256
PLOT_SUFFIXES = (".png", ".svg")
# A person's decision about a version (pipeline.registry.decisions) is the version tag review.<n>, n = 1, 2, ...:
# JSON with decision, by, at, reason (and the champion before or after), listed on the card under HISTORY_HEADING.
HISTORY_PREFIX = "review."
HISTORY_HEADING = "### Decision history"


def _cell(text: Any) -> str:
    # A markdown table cell: one line, no column breaks.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(_cell, row)) + " |" for row in rows)]


def decision_history(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """The people's decisions recorded in a version's tags, oldest first."""
    numbered = {int(key.removeprefix(HISTORY_PREFIX)): value for key, value in tags.items()
                if key.startswith(HISTORY_PREFIX) and key.removeprefix(HISTORY_PREFIX).isdecimal()}
    return [json.loads(numbered[number]) for number in sorted(numbered)]


def with_history(card: str, history: Sequence[Mapping[str, Any]]) -> str:
    """`card` with its decision-history section (last, replaced if there) listing `history`; unchanged if empty."""
    if not history:
        return card
    before = card.split(f"\n{HISTORY_HEADING}\n")[0].rstrip()
    rows = [[entry["at"], entry["by"], entry["decision"] + _champion_change(entry), entry["reason"]]
            for entry in history]
    return "\n".join([before, "", HISTORY_HEADING, "", *_table(["when", "who", "decision", "why"], rows)]) + "\n"


def _champion_change(entry: Mapping[str, Any]) -> str:
    if entry.get("champion_after"):
        return f" (champion now version {entry['champion_after']})"
    if entry.get("champion_before"):
        return f" (champion was version {entry['champion_before']})"
    return ""


def _difference(mine: float, theirs: float) -> str:
    return f"{mine - theirs:+.4g}" if mine != theirs else "0"


def _number(value: str | None) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def _metric_rows(model: ModelSpec, new: ModelVersion, champion: ModelVersion | None,
                 decide_on: str) -> list[list[str]]:
    rows = []
    for tag, split in key_tags(model, decide_on).items():
        mine = measure(model, new.tags, split, f"{new.name} version {new.version}")
        theirs = measure(model, champion.tags, split, f"version {champion.version}") if champion else None
        difference = "-"
        if theirs is not None and theirs.value is not None and mine.value is not None:
            difference = _difference(mine.value, theirs.value)
        role = "decides" if split == decide_on else "reported"
        rows.append([f"**{metric_label(tag)}** ({role})", mine.text(), theirs.text() if theirs else "-", difference])
    for tag in model.others:
        if tag in new.tags or (champion and tag in champion.tags):
            values = [new.tags.get(tag), champion.tags.get(tag) if champion else None]
            try:
                difference = _difference(float(values[0]), float(values[1]))
            except (TypeError, ValueError):
                difference = "-"
            rows.append([metric_label(tag), _number(values[0]), _number(values[1]), difference])
    return rows


def _data_rows(new: ModelVersion, champion: ModelVersion | None) -> list[list[str]]:
    rows = []
    champions = data_digests(champion.tags) if champion else {}
    for name, digest in data_digests(new.tags).items():
        theirs = champions.get(name)
        same = "-" if champion is None else "same" if theirs == digest else f"`{(theirs or 'none')[:SHORT]}`"
        rows.append([name, new.tags.get(f"data.{name}.size", "-"), f"`{digest[:SHORT]}`", same])
    return rows


def write_card(client: mlflow.MlflowClient, model: ModelSpec, new: ModelVersion, champion: ModelVersion | None,
               decision: str, verdict: Verdict | None, policy: Mapping[str, Any],
               samples: Sequence[tuple[str, str]] = (), recommendation: str | None = None) -> str:
    """The card of version `new`, judged against `champion` (None: the first version) under `policy`:
    what it is, its key metric beside the champion's, the data it saw, the params that differ from the
    champion's, up to three `samples` (prompt, output) and the plots its run carries. Set as the
    version's description and returned, with the history of people's decisions about it. `decision` is the
    policy's, promoted or kept; under manual approval `recommendation` says which, and the card says it awaits
    a person's approval."""
    run = client.get_run(new.run_id) if new.run_id else None
    lines = [f"**{new.name}, version {new.version}.** {model.summary}", ""]
    champion_name = f"champion (version {champion.version})" if champion else "champion (none yet)"
    if recommendation is not None:
        lines += [f"### Decision: awaiting approval ({recommendation}); `llm-pipeline review approve {new.name} "
                  f"{new.version}` makes it the champion", ""]
    else:
        outcome = "now the champion" if decision == "promoted" else f"the champion stays version {champion.version}"
        lines += [f"### Decision: {decision}, {outcome}", ""]
    if verdict is not None:
        lines += [verdict.reason, ""]
    lines += [f"Policy: {policy_text(policy, model)}"
              + ("" if verdict is None or verdict.gain is None else f" (here: {verdict.needed:.4g})") + ".", ""]
    lines += _table(["metric", f"this version ({new.version})", champion_name, "difference"],
                    _metric_rows(model, new, champion, policy["decide_on"]))
    lines += ["", "± is the standard error over the split's examples.", ""]

    tags = new.tags
    lineage = [f"stage `{tags.get('stage', '?')}`", f"run group `{tags.get('run_group', '?')}`",
               f"commit `{tags.get('git_commit', '?')[:8]}`" + (" (uncommitted changes)" if tags.get("git_dirty") == "true" else "")]
    if KERNELS_FACT in tags:
        lineage.append(f"C++ CPU kernels in training: {tags[KERNELS_FACT]}")
    if tags.get("dvc_exp"):
        lineage.append(f"DVC experiment `{tags['dvc_exp']}` from baseline `{tags.get('dvc_exp_baseline', '?')}`, "
                       f"changed: `{tags.get('dvc_exp_changed') or 'nothing'}`")
    lines += ["### Where it came from", "", "; ".join(lineage) + ".", ""]

    lines += ["### Data", ""]
    data = _data_rows(new, champion)
    lines += _table(["input", "size", "sha256", "champion's"], data) if data else ["No data hashes tagged."]

    lines += ["", "### Params that differ from the champion's", ""]
    if champion is None:
        lines.append("No champion to compare with.")
    elif run is None or not champion.run_id:
        lines.append("A run's params are not available.")
    else:
        changed = differing_params(run.data.params, client.get_run(champion.run_id).data.params)
        lines += _table(["param", "this version", "champion"], changed) if changed else ["None: the same params."]

    if samples:
        lines += ["", "### Samples (greedy)"]
        for prompt, output in samples[:3]:
            lines += ["", f"**Prompt:** {_cell(prompt)}", "", f"> {_cell(output) or '(empty)'}"]

    if run is not None:
        plots = [a.path for a in client.list_artifacts(new.run_id) if a.path.endswith(PLOT_SUFFIXES)]
        link = f"#/experiments/{run.info.experiment_id}/runs/{new.run_id}"
        lines += ["", "### Plots", "", f"In the artifacts of the [source run]({link}): "
                  + (", ".join(f"`{p}`" for p in plots) or "none") + "."]
        # The tracking server's UI serves a run's artifacts at get-artifact, relative to its root.
        lines += [f"\n![{p}](get-artifact?{urlencode({'path': p, 'run_uuid': new.run_id})})" for p in plots]
    text = with_history("\n".join(lines).rstrip() + "\n", decision_history(new.tags))
    client.update_model_version(new.name, str(new.version), description=text)
    return text
