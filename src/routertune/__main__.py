from routertune.cli import main

main()
