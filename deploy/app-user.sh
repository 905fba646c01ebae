#!/bin/sh
# Create the image's user `app` with uid and gid 1000 (the usual first user of a host, so that
# bind-mounted folders stay writable). Ubuntu 24.04 images already have a user `ubuntu` with uid
# 1000: `useradd --uid 1000` would fail there, so whoever holds uid 1000 is removed first.
set -eu
holder=$(getent passwd 1000 | cut -d: -f1 || true)
if [ -n "$holder" ] && [ "$holder" != app ]; then
    userdel --remove "$holder" 2>/dev/null || userdel "$holder"
fi
group=$(getent group 1000 | cut -d: -f1 || true)
if [ -n "$group" ] && [ "$group" != app ]; then
    groupdel "$group"
fi
if ! getent passwd app >/dev/null; then
    groupadd --gid 1000 app
    useradd --create-home --uid 1000 --gid 1000 app
fi
