# frozen_string_literal: true

require_relative "../flowctl" unless defined?(Flowctl::Server)

module Flowctl
  # The component SDK: a Ruby class with one method becomes a runnable flowctl component
  # (Flowctl::Component::Source, Processor, Consumer). See component/base.rb and README.md.
  module Component
  end
end

require_relative "component/duration"
require_relative "component/config_field"
require_relative "component/settings"
require_relative "component/metrics"
require_relative "component/tally"
require_relative "component/prometheus"
require_relative "component/health_server"
require_relative "component/gate"
require_relative "component/streams"
require_relative "component/state_store"
require_relative "component/registration"
require_relative "component/live_config"
require_relative "component/services"
require_relative "component/base"
require_relative "component/runtime"
require_relative "component/processor"
require_relative "component/source"
require_relative "component/consumer"
require_relative "component/seed_processor"
