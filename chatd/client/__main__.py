from chatd.client.cli import main

main()
