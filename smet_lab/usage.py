"""The text of `python -m smet_lab --help`: what smet_lab is, its main commands and every config
group's options (read from the shipped config files, so it never lists an option that is not there)."""

from __future__ import annotations

from smet_lab.preflight import config_groups, group_options

HELP = """smet_lab: dynamic sparse training (DST) of LLaMA-style language models with SMET (local Adam
step reset + warm-up for regrown weights, density-scaled learning rate, compact optimizer state), with
Ray Tune sweeps, MLflow tracking and stability reports.

Usage: python -m smet_lab [KEY=VALUE ...] [GROUP=OPTION ...] [experiment=NAME] [+sweep=NAME | -m KEY=A,B ...]

Main commands:
  python -m smet_lab                                       one run: tiny model, embedded corpus, smet at density 0.25
  python -m smet_lab method=naive_dst sparsity.density=0.1 train.max_steps=500
  python -m smet_lab data=text_files data.path=/data/my.txt  train on your own text (.txt/.jsonl/.json.gz)
  python -m smet_lab experiment=released_130m              a bundle: the released SMET 130M recipe (C4, one GPU)
  python -m smet_lab +sweep=density                        a Ray Tune sweep: MLflow parent + child runs + report
  python -m smet_lab -m sparsity.density=0.1,0.25 method=smet,naive_dst   the same grid as a Hydra multirun
  python -m smet_lab -m model=tiny,small,llama_9m method=smet,naive_dst   a group is an axis too: a scaling study
  python -m smet_lab +sweep=smoke sweep.retry_failed=true  resume a sweep, re-running its failed trials
  python -m smet_lab train.resume_from=outputs/<run>      resume a run as its command set it up (same MLflow run)
  torchrun --standalone --nproc_per_node=4 -m smet_lab train=gpu   one run, data parallel on 4 GPUs (or CPU processes)
  python -m smet_lab +sweep=density ray.workers_per_trial=4   every trial data parallel (Ray Train, 4 processes)
  python -m smet_lab.report SWEEP                          rebuild a sweep's stability report
  python -m smet_lab.report outputs/<run> outputs/<run2>   single runs' folders compared in one report
  python -m smet_lab.export sweeps/SWEEP --trial best --out model/   its best trial's weights as safetensors
  python -m smet_lab.export outputs/<run> --out model/ --sample 'def main('   and what the model writes next
  python -m smet_lab +sweep=density --plan                 what it would run (trials, what a resume keeps), run nothing
  python -m smet_lab --cfg job                             print the composed config (every key and value)
  mlflow ui --backend-store-uri sqlite:///mlflow.db         the dashboards

Config groups (GROUP=OPTION):
{groups}
  your own:    conf/sweep/NAME.yaml (or experiment/, model/, ...) + hydra.searchpath=[file://conf]

Hydra's own flags: python -m smet_lab --hydra-help
"""


def help_text() -> str:
    lines = []
    for group in config_groups():
        name = f"+{group}" if group == "sweep" else group  # sweep is optional: it needs its plus
        lines.append(f"  {name + ':':<12} {', '.join(group_options(group))}")
    return HELP.format(groups="\n".join(lines))
