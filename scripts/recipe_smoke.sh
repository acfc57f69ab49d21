#!/usr/bin/env bash
# The paper's recipe (docs/fpdm.md, "The paper's recipe, step by step") end to end at tiny scale on a CPU:
# encode images to VAE latents -> train an FPDM on 2 gloo processes under torchrun -> sample on 2 processes,
# decoded with the VAE -> Inception FID against saved reference statistics. The same commands as at full
# scale; only the sizes, and the stand-ins for the real inputs (scripts/recipe_smoke_assets.py: random images,
# a tiny random AutoencoderKL, random Inception weights), differ. Its numbers mean nothing: it checks that
# the stages fit together.
#
#   bash scripts/recipe_smoke.sh [DIR]     # everything under DIR (default: a new mktemp -d); about a minute
#
# Needs the `vae` extra (diffusers). PYTHON names the interpreter (default: python); `python -m
# torch.distributed.run` is torchrun, run through that interpreter.
set -euo pipefail

DIR=${1:-$(mktemp -d)}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export OMP_NUM_THREADS=1  # one thread per process: 2 ranks on a 2-core machine
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2)
mkdir -p "$DIR"
START=$SECONDS

step() { printf '\n== [%3d s] %s\n' "$((SECONDS - START))" "$*"; }

step "0/5 inputs: 24 random 32x32 PNGs in 2 class folders, a tiny random AutoencoderKL, random Inception weights"
"$PYTHON" "$HERE/recipe_smoke_assets.py" "$DIR"

step "1/5 encode the images to VAE latents, each also mirrored (--flip, fast-DiT's set)"
"$PYTHON" -m fpdm.encode --dataset "folder:$DIR/images" --image-size 32 --flip --vae "$DIR/vae" \
    --out "$DIR/latents" --batch-size 8 --shard-size 12 --workers 0 --device cpu --quiet

step "2/5 train FPDM-T/2 on the latents: 2 gloo processes under torchrun, 4 steps"
"${TORCHRUN[@]}" -m fpdm.train --model FPDM-T/2 --dataset "latents:$DIR/latents" --steps 4 --batch-size 8 \
    --lr 1e-4 --warmup 1 --weight-decay 0 --ckpt-every 4 --log-every 1 --sample-steps 0 --device cpu \
    --out "$DIR/run" --quiet

step "3/5 sample 4 images on 2 processes, decoded with the VAE"
"${TORCHRUN[@]}" -m fpdm.sample --ckpt "$DIR/run/checkpoints/latest.pt" --vae "$DIR/vae" --num-samples 4 \
    --batch-size 2 --steps 3 --seed 0 --device cpu --out "$DIR/samples" --quiet

step "4/5 reference statistics of the real images (--save-stats; at full scale ADM's VIRTUAL_imagenet256_labeled.npz)"
"$PYTHON" -m fpdm.evaluate --samples "$DIR/reference.npz" --inception "$DIR/pt_inception.pth" \
    --save-stats "$DIR/ref_stats.npz" --quiet > "$DIR/ref_stats.json"

step "5/5 Inception FID, sFID and IS of the samples against the reference statistics, features on 2 processes"
"${TORCHRUN[@]}" -m fpdm.evaluate --samples "$DIR/samples/samples.npz" --inception "$DIR/pt_inception.pth" \
    --ref-stats "$DIR/ref_stats.npz" --device cpu --quiet > "$DIR/evaluate.json"
cat "$DIR/evaluate.json"

step "done: everything is in $DIR"
