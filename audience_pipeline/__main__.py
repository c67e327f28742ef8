from audience_pipeline.cli import main

main(prog_name="audience-pipeline")
