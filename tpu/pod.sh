#!/usr/bin/env bash
# Cloud TPU VMs for wdmjax: create, install, train on every worker, stream logs, stop, delete.
#
#   tpu/pod.sh [flags] create | install | mount | train CONFIG [ARGS...] | finetune ARGS... |
#                      logs | status | stop | delete
#
# Flags (or the environment variables in brackets):
#   --name NAME       TPU VM name                         [TPU_NAME, default wdmjax]
#   --zone ZONE       e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)  [TPU_ZONE]
#   --type TYPE       accelerator type: v4-8, v4-32, v5litepod-16, v5p-32 ...   [TPU_TYPE]
#   --version VER     TPU software version (default by --type's generation)  [TPU_VERSION]
#   --project ID      Google Cloud project (default: gcloud's)              [TPU_PROJECT]
#   --bucket NAME     GCS bucket mounted at /mnt/wdmjax on every worker      [TPU_BUCKET]
#   --spot            create a Spot VM (preemptible; a run resumes from its checkpoints)
#   --dry-run         print the gcloud commands instead of running them
#
# Every worker of a pod runs the same command; JAX discovers the others by itself (no
# --coordinator flags on Cloud TPU). Checkpoints must be on storage that every worker sees:
# the workdir lives in the bucket, mounted with Cloud Storage FUSE at /mnt/wdmjax.
set -euo pipefail

NAME=${TPU_NAME:-wdmjax}
ZONE=${TPU_ZONE:-}
TYPE=${TPU_TYPE:-}
VERSION=${TPU_VERSION:-}
PROJECT=${TPU_PROJECT:-}
BUCKET=${TPU_BUCKET:-}
SPOT=0
DRY=0
MOUNT=/mnt/wdmjax
LOG='$HOME/wdmjax.log'

die() { echo "tpu/pod.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --type) TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    --*) die "unknown flag $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "expected a command: create, install, mount, train, finetune, logs, status, stop or delete"
CMD=$1; shift
[[ -n $ZONE ]] || die "--zone: expected a zone with TPU capacity, e.g. us-central2-b"

run() {  # prints the command; runs it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY -eq 0 ]]; then "$@"; fi
}

GC=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
[[ -n $PROJECT ]] && COMMON+=(--project "$PROJECT")

on_all() {  # runs a shell command on every worker of the pod at once
  run "${GC[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$1"
}

default_version() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "--type: expected v4-N, v5litepod-N, v5p-N or v6e-N, got '$1'" ;;
  esac
}

quote_args() { local out='' a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }

case $CMD in
  create)
    [[ -n $TYPE ]] || die "--type: expected an accelerator type, e.g. v4-8 or v5litepod-16"
    VERSION=${VERSION:-$(default_version "$TYPE")}
    args=(create "$NAME" "${COMMON[@]}" --accelerator-type "$TYPE" --version "$VERSION")
    [[ $SPOT -eq 1 ]] && args+=(--spot)
    run "${GC[@]}" "${args[@]}"
    ;;
  install)
    # The same wheel on every worker: built here from this checkout, copied, installed with
    # JAX's TPU runtime (the `tpu` extra).
    root=$(cd "$(dirname "$0")/.." && pwd)
    run rm -rf "$root/dist"
    run python -m pip wheel --no-deps -w "$root/dist" "$root"
    wheel=$root/dist/wdmjax-*.whl
    [[ $DRY -eq 1 ]] || wheel=$(ls "$root"/dist/wdmjax-*.whl)
    run "${GC[@]}" scp "$wheel" "$NAME:" "${COMMON[@]}" --worker=all
    on_all "python3 -m pip install --upgrade pip && python3 -m pip install \"\$(ls ~/wdmjax-*.whl)[tpu]\""
    ;;
  mount)
    [[ -n $BUCKET ]] || die "--bucket: expected the GCS bucket for workdirs and data"
    on_all "sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && (mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT)"
    ;;
  train|finetune)
    [[ $# -ge 1 ]] || die "$CMD: expected wdmjax $CMD arguments, e.g. --config ... --workdir $MOUNT/run"
    # nohup: the run survives the ssh session; every worker logs to $LOG, only process 0
    # writes metrics, samples and the progress bar.
    on_all "cd \$HOME && WDMJAX_DATA_DIR=$MOUNT/tensorflow_datasets nohup wdmjax $CMD$(quote_args "$@") --no-progress < /dev/null > $LOG 2>&1 &"
    ;;
  logs)
    run "${GC[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 --command "tail -n 100 -F $LOG"
    ;;
  status)
    run "${GC[@]}" describe "$NAME" "${COMMON[@]}" --format "value(state,acceleratorType,health)"
    on_all "pgrep -af 'wdmjax (train|finetune)' || echo not running"
    ;;
  stop)
    # SIGTERM is JAX's preemption notice: the workers agree on a step, save a checkpoint
    # there and exit; rerunning `train` resumes.
    on_all "pkill -TERM -f 'wdmjax (train|finetune)' || true"
    ;;
  delete)
    run "${GC[@]}" delete "$NAME" "${COMMON[@]}" --quiet
    ;;
  *) die "unknown command '$CMD'; expected create, install, mount, train, finetune, logs, status, stop or delete" ;;
esac
