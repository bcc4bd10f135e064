# frozen_string_literal: true

# Wires bench/pipeline.rb's Flowctl::Component components like `flowctl run` does, with the
# gem's flowctl.v1 clients. ruby flowctl_runner.rb SOURCE_PORT PROCESSOR_PORT CONSUMER_PORT COUNT WARMUP
$LOAD_PATH.unshift File.expand_path("../../lib", __dir__)
require "flowctl"
require_relative "timing"

V1 = Flowctl::V1
sp, pp, cp, count, warmup = ARGV
source = V1::SourceClient.new("127.0.0.1:#{sp}", tls: false)
processor = V1::ProcessorClient.new("127.0.0.1:#{pp}", tls: false)
consumer = V1::ConsumerClient.new("127.0.0.1:#{cp}", tls: false)
PipelineTiming.report(Integer(count), Integer(warmup)) do |n|
  events = source.stream_events(V1::StreamRequest.new(params: { "count" => n.to_s }))
  consumer.consume(processor.process(events)).events_consumed
end
