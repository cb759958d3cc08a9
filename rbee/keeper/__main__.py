from rbee.keeper.cli import main

main()
