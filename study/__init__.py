"""A study's machinery behind reproduce.py and report.py: its command line and study files
(study_options), its runs and their time (study_plan), checked records (records), learning
curves read from TensorBoard (learning_curves) and figures. The study files are in studies/."""
