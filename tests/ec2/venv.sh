#!/usr/bin/env bash
# Makes a Python virtual environment with the real AWS clients (boto3 and
# the aws CLI, from PyPI) for the EC2 endpoint's tests, and prints its
# directory. Idempotent: an environment that already has both is kept.
#   bash tests/ec2/venv.sh            # -> target/ec2-venv
#   FERRO_EC2_VENV=/x bash tests/ec2/venv.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${FERRO_EC2_VENV:-$root/target/ec2-venv}
# Pinned together: awscli pins the botocore that boto3 must share.
pins=(boto3==1.44.18 awscli==1.46.3)
if [ -x "$venv/bin/aws" ] && "$venv/bin/python" -c "import boto3" 2>/dev/null; then
  echo "$venv"
  exit 0
fi
python3 -m venv "$venv" >&2 || {
  echo "tests/ec2/venv.sh: python3 -m venv failed (install python3-venv: deploy/install-deps.sh)" >&2
  exit 1
}
"$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
echo "$venv"
