# frozen_string_literal: true

# A source: "number" events for start_ledger..end_ledger (the params `flowctl run` sends).
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"

class Numbers < Flowctl::Component::Source
  info name: "numbers", version: "1.0.0", output_event_types: ["number"]

  def each_event(request)
    first, last = request.params.values_at("start_ledger", "end_ledger").map { |v| Integer(v || 0) }
    (first..(last < first ? first + 9 : last)).each { |n| yield({ id: n.to_s, type: "number", payload: n.to_s }) }
  end
end
Numbers.run
