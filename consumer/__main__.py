from consumer.entry import main

main()
