@echo off
rem Starts the natproxy local proxy in a minimised window at log-in.
rem
rem   1. Put natproxy.exe in %LOCALAPPDATA%\natproxy\ (or change the path below).
rem   2. natproxy init local   (writes %APPDATA%\natproxy\proxy.toml; edit it)
rem   3. Win+R, shell:startup, Enter; copy this file into that folder.
rem
rem Ctrl-C in the window, or closing it, shuts the proxy down cleanly.
rem For a start without any window, use natproxy-local.xml (Task Scheduler).
start "natproxy local" /min "%LOCALAPPDATA%\natproxy\natproxy.exe" local -c "%APPDATA%\natproxy\proxy.toml"
