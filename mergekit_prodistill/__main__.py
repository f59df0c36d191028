from mergekit_prodistill.cli import main

main(prog_name="python -m mergekit_prodistill")
