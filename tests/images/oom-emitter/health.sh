#!/bin/sh
# One HTTP exchange for `nc -ll -p PORT -e /health.sh`: stdin/stdout are the connection.
# Read the request head up to its blank line, then answer 200 with a small JSON body.
cr=$(printf '\r')
while IFS= read -r line; do
    case $line in "" | "$cr") break ;; esac
done
body='{"status":"ok"}'
printf 'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
    "${#body}" "$body"
