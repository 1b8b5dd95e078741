from pacsd.cli import main

main()
