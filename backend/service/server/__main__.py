"""`python -m backend.service.server`: the same as `farslip serve`, without the CLI's dependencies."""

import argparse

from .lifecycle import exit_now, serve_command

parser = argparse.ArgumentParser(description="Run the FarSLIP backend (same as `farslip serve`).")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--token")
parser.add_argument("--connection-file")
parser.add_argument("--state-dir")
parser.add_argument("--device", default="auto")
parser.add_argument("--parent-pid", type=int)
arguments = parser.parse_args()
exit_now(serve_command(arguments.host, arguments.port, arguments.token, arguments.connection_file,
                       arguments.state_dir, arguments.device, parent_pid=arguments.parent_pid))
