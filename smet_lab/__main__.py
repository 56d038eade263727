from smet_lab.cli import main

main()
