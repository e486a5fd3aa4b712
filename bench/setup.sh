#!/bin/sh
# Install what bench/run.py needs: postfix's smtp-source (postfix itself is
# left stopped and disabled so it never takes port 25) and py-spy for
# --profile.  aiosmtpd comes from PyPI.  Run as root.
set -e
if ! [ -x /usr/sbin/smtp-source ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix
fi
# Never leave the postfix daemon running.
if command -v postfix >/dev/null 2>&1; then
    postfix stop >/dev/null 2>&1 || true
fi
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now postfix >/dev/null 2>&1 || true
fi
python3 -m pip install -q aiosmtpd py-spy
