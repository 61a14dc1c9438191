// Which signals end a role and which reloads it, per platform. Node on
// Windows raises SIGINT for Ctrl-C (and Ctrl-Break as SIGBREAK) and SIGHUP
// when the console window is closed (CTRL_CLOSE_EVENT); Windows kills the
// process some seconds after that whatever it does, so there SIGHUP can only
// mean "shut down now, cleanly". On POSIX, SIGHUP keeps its daemon meaning:
// re-read the configuration (systemctl reload).

export function shutdownSignals(platform: NodeJS.Platform): NodeJS.Signals[] {
  return platform === "win32" ? ["SIGINT", "SIGTERM", "SIGBREAK", "SIGHUP"] : ["SIGINT", "SIGTERM"];
}

export function reloadSignal(platform: NodeJS.Platform): NodeJS.Signals | undefined {
  return platform === "win32" ? undefined : "SIGHUP";
}
