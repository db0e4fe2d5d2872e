from dsv41.cli import main

main()
