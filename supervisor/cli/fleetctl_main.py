"""`python -m supervisor.cli.fleetctl_main` runs fleetctl (used where no script is on PATH)."""

from supervisor.cli.fleetctl import main

main()
