from peftune.cli import main

main()
