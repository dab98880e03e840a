"""The method: MAML++'s inner loop and outer step with MELO's weighted loss (meta_learner),
how a task batch's inner loops run (inner_loop_execution) and its meta-gradient
(meta_gradient), the rating loss, every learning rate as a function of the step, the tasks
drawn from the users, and the one evaluation protocol of Basic, MAML and MELO."""
