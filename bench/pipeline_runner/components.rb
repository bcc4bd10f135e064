# frozen_string_literal: true

# bench/pipeline_runner.rb's components on Flowctl::Component, started by the runner's
# Supervisor with flowctl run's environment: ruby components.rb source|processor|consumer
require_relative "../pipeline/bench_components"

{ "source" => BenchSource, "processor" => BenchProcessor, "consumer" => BenchConsumer }.fetch(ARGV[0]).run(grace: 1)
