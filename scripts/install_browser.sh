#!/bin/sh
# Debian's Chromium and its ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver): what the
# served search page's browser test drives (tests/test_search_page.py runs this when they are
# missing; `make browser` does too). Needs root or sudo and Debian's package archive.
set -e
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
echo "installing Debian's chromium and chromium-driver (about 30 s)"
$SUDO apt-get install -y -q chromium chromium-driver >/dev/null \
  || { $SUDO apt-get update -q >/dev/null \
       && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }
/usr/bin/chromium --version
