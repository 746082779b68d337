"""``python -m stad`` runs the command-line interface."""

from stad.cli import main

if __name__ == "__main__":
    main()
