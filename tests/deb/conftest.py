"""tests/deb/ installs the Debian package on this machine: only with SMARTRELAY_DEB set
(`make deb-check`, run by .ci/run after `make check`), never in the ordinary suite."""

import os

collect_ignore_glob = [] if os.environ.get("SMARTRELAY_DEB") else ["*"]
