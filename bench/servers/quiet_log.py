"""A twistd log observer that drops every event (``twistd --logger``).

Used by the optional ``twisted_smtpd_quiet`` server of bench/run.py to show
how much of twisted_smtpd's time goes into formatting its log lines.
"""


def observer():
    def drop(event):
        pass

    return drop
