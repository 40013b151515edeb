#!/usr/bin/env bash
# Make Fashion-MNIST available to care, in this order:
#   1. already there: $CARE_DATA/fashion-mnist, ./data/fashion-mnist or /usr/share/datasets/fashion-mnist;
#   2. the Debian package dataset-fashion-mnist, where apt is available (as root or with sudo);
#   3. the official files, downloaded into ./data/fashion-mnist, for users with internet;
#   4. otherwise stop with a clear error.
set -euo pipefail
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have() { for f in $files; do [ -s "$1/$f" ] || return 1; done; }

for dir in "${CARE_DATA:+$CARE_DATA/fashion-mnist}" data/fashion-mnist /usr/share/datasets/fashion-mnist; do
  if [ -n "$dir" ] && have "$dir"; then echo "fashion-mnist: found in $dir"; exit 0; fi
done

if command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo="sudo -n"; }
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
    echo "fashion-mnist: installing the Debian package dataset-fashion-mnist"
    if $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
       || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
      have /usr/share/datasets/fashion-mnist && { echo "fashion-mnist: installed in /usr/share/datasets/fashion-mnist"; exit 0; }
    fi
    echo "fashion-mnist: the Debian package could not be installed; trying a download"
  fi
fi

url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
mkdir -p data/fashion-mnist
for f in $files; do
  if ! curl -fsSL --connect-timeout 10 -o "data/fashion-mnist/$f.part" "$url/$f"; then
    rm -f data/fashion-mnist/*.part
    echo "error: could not get Fashion-MNIST: install the Debian package dataset-fashion-mnist, or put the four IDX .gz files from $url in data/fashion-mnist/" >&2
    exit 1
  fi
  mv "data/fashion-mnist/$f.part" "data/fashion-mnist/$f"
done
echo "fashion-mnist: downloaded to data/fashion-mnist"
