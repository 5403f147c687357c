from datahaul.cli import main

main()
