# frozen_string_literal: true

# A consumer: prints each "squared" event (its prefix from config: PREFIX in the environment).
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
$stdout.sync = true

class Printer < Flowctl::Component::Consumer
  info name: "printer", version: "1.0.0", input_event_types: ["squared"]
  config :prefix, default: "squared"

  def consume(event) = puts("#{config[:prefix]} #{event.id}: #{event.payload}")
end
Printer.run
