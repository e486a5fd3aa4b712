"""An aiosmtpd server with a Sink-like handler (accepts and drops everything).

python bench/servers/aiosmtpd_server.py --port 2527
"""

import argparse
import asyncio
import logging
import sys

from aiosmtpd.smtp import SMTP


class Sink:
    async def handle_DATA(self, server, session, envelope):
        envelope.content = envelope.original_content = None
        return "250 OK"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--max-message-size", type=int, default=209715200)
    args = parser.parse_args(argv)

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    handler = Sink()

    def factory():
        return SMTP(
            handler,
            hostname="bench.local",
            data_size_limit=args.max_message_size,
            auth_require_tls=False,
        )

    async def serve():
        server = await asyncio.get_running_loop().create_server(
            factory, host=args.host, port=args.port, backlog=args.backlog
        )
        sys.stdout.write(f"listening on {args.host}:{args.port}\n")
        sys.stdout.flush()
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
