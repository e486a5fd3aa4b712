from twisted.application.service import ServiceMaker

smtpd = ServiceMaker(
    "twisted_smtpd", "twisted_smtpd.tap", "An SMTP/ESMTP server", "smtpd"
)
