# frozen_string_literal: true

# bench/pipeline.rb's components on Flowctl::Component (the same behaviour as
# official_components.rb): ruby flowctl_components.rb source|processor|consumer PORT
require_relative "bench_components"

kind, port = ARGV
{ "source" => BenchSource, "processor" => BenchProcessor, "consumer" => BenchConsumer }
  .fetch(kind).run(port: Integer(port), control_plane: false, grace: 1)
