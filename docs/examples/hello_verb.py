"""A protocol subclass that adds a verb and replaces one (docs/subclassing.rst)."""

from twisted_smtpd import Reply, SMTPFactory
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.protocol import SMTPServerProtocol


class HelloProtocol(SMTPServerProtocol):
    def do_XHELLO(self, argument: str) -> None:
        """A new verb: any do_VERB method is one."""
        self.reply(Reply(250, "2.0.0", f"Hello {argument or 'stranger'}"))

    def do_VRFY(self, argument: str) -> None:
        """Replacing a built-in verb: this server does not answer VRFY at all."""
        self.reply(Reply(502, "5.5.1", "VRFY is off here"))


factory = SMTPFactory(MemoryHandler(), hostname="mx.example.org")
factory.protocol = HelloProtocol
