"""A twistd log observer that formats every event and writes it to os.devnull.

Used as ``twistd --logger bench.servers.devnull_log.observer``: the same cost
as the twisted.mail bench server's observer.  Never use ``twistd -l /dev/null``
as root: twistd's log rotation renames the file once it passes 1 MB, which
replaces the /dev/null device with a regular file.
"""

import os

from twisted.logger import textFileLogObserver


def observer():
    return textFileLogObserver(open(os.devnull, "w"))


def fast_observer():
    """twisted_smtpd's own observer (twisted_smtpd.fastlog), to os.devnull."""
    from twisted_smtpd.fastlog import FastLogObserver

    return FastLogObserver(open(os.devnull, "w"))
