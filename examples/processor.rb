# frozen_string_literal: true

# A processor: squares each "number" event.
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"

class Square < Flowctl::Component::Processor
  info name: "square", version: "1.0.0", input_event_types: ["number"], output_event_types: ["squared"]

  def process(event) = Flowctl::V1::Event.new(id: event.id, type: "squared", payload: (event.payload.to_i**2).to_s)
end
Square.run
